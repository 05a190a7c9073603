"""Judges that measure what a trained model generates."""
