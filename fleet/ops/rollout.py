"""Rollout campaigns as use cases: create one, and the operator's actions on it (pause, resume, abort, rollback).

:func:`create` checks every rule before anything is written: the release exists and is not revoked, the options
parse, the selection holds devices that can run the release, and no other active campaign of the same model holds
any of them. It plans the waves (seeded, so the same seed and devices give the same plan) and records the campaign
``pending``, audited; the controller in `fleet serve` starts it at its next round. An action moves the campaign by
the table of :mod:`fleet.rollout.states` and is audited; the controller acts on it at its next round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fleet.errors import FleetError, Invalid, NotFound
from fleet.ops.assign import incompatible
from fleet.rollout.plan import plan_waves
from fleet.rollout.spec import CampaignSpec
from fleet.rollout.states import ACTIVE, CampaignEvent, CampaignState, ExecState, IllegalMove, next_campaign
from fleet.store.api import Store
from fleet.store.rows import Campaign, Decision, Execution
from fleet.trust.repository import Repository
from fleet.views import release_ref

#: The operator's actions, by the name the CLI and the HTTP API give them.
ACTIONS = {
    "pause": CampaignEvent.PAUSE,
    "resume": CampaignEvent.RESUME,
    "abort": CampaignEvent.ABORT,
    "rollback": CampaignEvent.ROLLBACK,
}


@dataclass(frozen=True)
class Created:
    """A recorded campaign, the devices the selection matched that it left out (with why), and the devices a
    rollback could not return (with why: :func:`unreturnable`)."""

    campaign: Campaign
    skipped: dict[str, str]
    cannot_roll_back: dict[str, str]


def unreturnable(repo: Repository, model: str, ref: str | None) -> str | None:
    """Why a device that ran ``ref`` before a campaign could not be sent it back by a rollback (None if it can): it
    ran no release of the model, or one the repository does not hold (a factory model) or has revoked since. Such a
    device keeps what it runs; its own revert still undoes a release that fails on it."""
    if ref is None:
        return f"it ran no release of {model} before this campaign"
    name, _, version = ref.partition(":")
    try:
        release = repo.release(name, version)
    except NotFound:
        return f"it ran {ref}, which is not a published release (a factory model): it keeps what it runs"
    if release["revoked"]:
        return f"it ran {ref}, which is revoked: it keeps what it runs"
    return None


def create(store: Store, repo: Repository, name: str, version: str, spec: CampaignSpec, *, actor: str) -> Created:
    """Check, plan and record a campaign shipping ``name:version``; see the module docstring."""
    release = repo.release(name, version)
    ref = release_ref(name, version)
    if release["revoked"]:
        raise FleetError("revoked", f"{ref} is revoked (min_release {release['min_release']}): devices refuse it",
                         "publish a new version and roll that out")  # fmt: skip
    selector = spec.selector
    selected = [d for d in store.devices() if selector.matches(d)]
    if not selected:
        raise Invalid("no_devices", f"no device matches --select {selector.text or '(all)'}",
                      "check the tags and releases with `fleet devices list`")  # fmt: skip
    skipped: dict[str, str] = {}
    targets = []
    for d in selected:
        if d.releases.get(name) == ref:
            skipped[d.device_id] = f"already runs {ref}"
        elif problems := incompatible(d, release):
            skipped[d.device_id] = "; ".join(problems)
        else:
            targets.append(d)
    if not targets:
        raise Invalid("no_devices", f"every device --select matches is left out: {_first(skipped)}",
                      "select devices that do not run the release yet and can run it")  # fmt: skip
    groups = {d.device_id: d.tags.get(spec.spread_by, "") for d in targets} if spec.spread_by else None
    waves = plan_waves([d.device_id for d in targets], spec.wave_sizes, spec.seed, groups)
    by_id = {d.device_id: d for d in targets}
    executions = []
    for wave, ids in enumerate(waves):
        for device_id in ids:
            executions.append(Execution("", device_id, wave, len(executions), ExecState.QUEUED.value,
                                        from_release=by_id[device_id].releases.get(name)))  # fmt: skip
    now = time.time()
    draft = Campaign("", ref, name, spec.to_dict(), CampaignState.PENDING.value, -1, len(waves), None, None, now, now,
                     actor)  # fmt: skip
    detail = {"release": ref, "devices": len(executions), "waves": [len(w) for w in waves], "spec": spec.to_dict(),
              "skipped": len(skipped)}  # fmt: skip
    made, overlap = store.create_campaign(draft, executions, [s.value for s in ACTIVE], detail)
    if made is None:
        held = "; ".join(f"{cid} holds {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"
                         for cid, ids in overlap.items())  # fmt: skip
        raise FleetError("overlapping_campaign", f"another active campaign of {name} targets some of these devices: "
                         f"{held}", "wait for it to end, abort it (`fleet rollout abort ID`), or --select other "
                         "devices. Nothing was created")  # fmt: skip
    why_not = {ref: unreturnable(repo, name, ref) for ref in {e.from_release for e in executions}}
    cannot = {e.device_id: why for e in executions if (why := why_not[e.from_release]) is not None}
    return Created(made, skipped, cannot)


def act(store: Store, campaign_id: str, action: str, *, actor: str, reason: str | None = None) -> Campaign:
    """Take an operator's ``action`` (a key of :data:`ACTIONS`) on the campaign; audited as ``rollout_<action>``."""
    how = ACTIONS[action]
    for _ in range(3):  # the controller may move it between our read and our write: read again
        campaign = get(store, campaign_id)
        try:
            new = next_campaign(CampaignState(campaign.state), how)
        except IllegalMove as exc:
            raise FleetError("illegal_action", str(exc), "see `fleet rollout status " + campaign.id + "`") from None
        why = reason or (f"{action} by {actor}" if how in (CampaignEvent.PAUSE, CampaignEvent.ABORT,
                                                           CampaignEvent.ROLLBACK) else None)  # fmt: skip
        moved = store.move_campaign(campaign.id, campaign.state, new.value, actor=actor, action=f"rollout_{action}",
                                    detail={"reason": why} if why else {}, reason=why)  # fmt: skip
        if moved is not None:
            return moved
    raise FleetError("busy", f"{campaign_id} kept changing while this ran", "run the command again")


def get(store: Store, campaign_id: str) -> Campaign:
    """A campaign by its id (``rollout-3``, or just ``3``); :class:`NotFound` names the known ones."""
    wanted = campaign_id if campaign_id.startswith("rollout-") else f"rollout-{campaign_id}"
    found = store.campaign(wanted)
    if found is None:
        known = [c.id for c in store.campaigns()][-5:]
        raise NotFound("unknown_campaign", f"no campaign {campaign_id!r}",
                       f"known: {', '.join(known)}" if known else "create one with `fleet rollout create`")  # fmt: skip
    return found


def _first(skipped: dict[str, str]) -> str:
    device_id, why = next(iter(skipped.items()))
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return f"{device_id}: {why}{more}"


def status(store: Store, campaign_id: str) -> tuple[Campaign, list[Execution], list[Decision]]:
    """A campaign with its executions and recorded decisions (what `fleet rollout status` shows)."""
    campaign = get(store, campaign_id)
    return campaign, store.executions(campaign.id), store.decisions(campaign.id)
