"""Wire formats: one package per API format, split by direction.

Each package has a ``client`` module (the format as clients speak it to the router) and, for
formats the router also speaks to providers, an ``upstream`` module; what both directions
share lives beside them. `base` holds the contract (`ClientFormat`, `UpstreamFormat`),
`registry` finds a format by path or provider type, and `fields` holds the helpers every
format uses. Formats translate only through the IR (`router.ir`).
"""
