"""Stand-ins for the A1111 host modules no registry has, shaped after the v1.10.1 source
(docs/design.md §6) (call order, arguments, the registry a plain dict cleared after scripts
load, activate once per batch with [] for unmentioned handlers). Only what NetWeave touches."""
