"""Rollout campaigns: the campaign and device state machines (pure tables), what a campaign targets and in which
waves, maintenance windows, the gates' statistics, and the controller that drives campaigns inside `fleet serve`."""
