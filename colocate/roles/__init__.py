"""Roles, the extra tenants of an RLHF pipeline: the base of a user's own (``base``), the
frozen model (``frozen``) the reference policy and the reward model parameterise, the critic."""

from colocate.roles.base import Role, RoleActor

__all__ = ["Role", "RoleActor"]
