"""The torch-free half of federated training: protocol stubs, roles, PKI, enrollment bundles, the weights wire format
and the mTLS transport, everything a limited center's node (and a site) needs without the `train` extra."""
