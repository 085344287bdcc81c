"""Data sources, preparation and augmentation."""
