"""The partner certificate watch (#18): certificates partners present, and probes of send partners' MX hosts.

* :mod:`milterd.watch.state` — the in-process view (known certificates per partner and direction,
  the six ``milterd_partner_*`` metrics, observations queued for the store; O(1), never waits);
* :mod:`milterd.watch.service` — the history refresh from the store and the probe scheduler
  (started by the daemon after the store services);
* :mod:`milterd.watch.probe` — one probe of a send partner's MX hosts (STARTTLS, would it pass);
* ``plugins/partner_watch.py`` — the built-in plugin feeding inbound sightings to the state.
"""
