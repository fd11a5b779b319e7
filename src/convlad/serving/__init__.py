"""``convlad serve``: the service's domain (``service``: whole operations, domain errors, no HTTP) and
its HTTP layer (``serve``: parsing, statuses, admission, tokens, headers) with the page (``web/``)."""
