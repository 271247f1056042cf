"""Head → neuron look-ups (Neo et al., arXiv 2402.15055): find, mine, attribute, ablate."""
