"""The embedded demo: a procedural shapes domain, the tiny text-to-image base trained on it, and the classifier
that judges images of it. Nothing else in the package depends on it."""
