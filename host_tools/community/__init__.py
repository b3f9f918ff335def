"""A community of houses for the trading benchmark and the bench: the data format, its loader
(stdlib only) and, host side, the generator of the committed fixture."""
