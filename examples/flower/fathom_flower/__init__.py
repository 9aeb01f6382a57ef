"""FATHOM ("Federated Hypergradient Descent", arXiv 2211.02106) in a Flower app on digits."""
