"""digits_app: a Flower app that trains an MLP on the 8x8 digits with fedsim's Flag Aggregator."""
