"""hetfed's heterogeneous federation as a Flower app."""
