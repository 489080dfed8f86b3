"""What makes a release trustworthy: signing keys, the TUF repository, the director, the repository server, renewal."""
