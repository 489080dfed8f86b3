"""The project's own example models, built from data that ships inside scikit-learn: nothing is downloaded."""
