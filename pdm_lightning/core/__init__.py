"""The base layer: errors, seeding, dtypes, atomic files, image files and model loading (imports nothing above it)."""
