"""The fault-injection harness: operation histories, a concurrent workload, and the checkers of G1–G4."""
