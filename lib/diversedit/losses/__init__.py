"""Training objectives: flow matching, REPA, DiverseDiT diversity and the add-on methods."""
