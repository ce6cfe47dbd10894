"""Roles, the extra tenants of an RLHF pipeline: the base of a user's own (``base``), the
reference policy, the reward model and the critic."""

from colocate.roles.base import Role, RoleActor

__all__ = ["Role", "RoleActor"]
