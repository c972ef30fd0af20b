"""Backend implementations; see base.py for the contract every backend follows."""
