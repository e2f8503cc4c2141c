"""The Flower ServerApp of fedembed (the coordinator): Flower wiring over fedembed."""
