"""The update path on the device: desired state in, a verified, smoke-tested, probation-watched release out."""
