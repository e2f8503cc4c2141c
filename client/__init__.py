"""The Flower ClientApp of fedembed (an organisation): Flower wiring over fedembed."""
