"""The operations surface of ``jetyolo run``: an optional HTTP endpoint (Prometheus ``/metrics``,
``/healthz``, ``/api/stats``, a live annotated preview page) and Home Assistant MQTT discovery.

- ``access``: where the endpoint may listen and who may read it (loopback by default; another
  address only with an explicit setting and credentials read from a file).
- ``metrics``: the Prometheus registry, read from the run's live counters at scrape time.
- ``preview``: annotated, downscaled JPEG frames, encoded only while someone watches.
- ``server``: the ``ThreadingHTTPServer`` and its routes; ``page``: the HTML page.
- ``homeassistant``: the retained ``homeassistant/...`` discovery config messages.

See docs/http.md.
"""
