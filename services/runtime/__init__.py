"""What every Janna service shares: start-up, config, logging, clients, identity."""
