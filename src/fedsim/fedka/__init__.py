"""FedKA (Sun, Chong & Ochiai, "Feature Distribution Matching for Federated Domain
Generalization", ACML 2022, arXiv 2203.11635): MK-MMD matching against a global workspace
(:mod:`.mmd`), federated voting for target pseudo-labels (:mod:`.voting`), the plug-in
(:mod:`.algorithm`)."""
