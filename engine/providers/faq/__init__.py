"""FAQ understanding: text normalisation, caller intent, question matching."""
