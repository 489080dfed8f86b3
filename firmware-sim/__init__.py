"""firmware-sim: fleets of real agents on one machine, with faults and drift injected."""
