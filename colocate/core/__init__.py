"""The protocol core: the actors' contract, typed calls, the hand-over table and its executor,
the phases, the coordinator, its fleet, its run configuration, and the weight-sync driver."""
