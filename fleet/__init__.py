"""The fleet manager: releases, rollouts, telemetry ingest, drift, rollback."""
