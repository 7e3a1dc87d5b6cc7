"""Stand-ins for the A1111 host modules no registry has, shaped after shared/reference/hosts.md
and the v1.10.1 source (call order, arguments, the registry a plain dict cleared after scripts
load, activate once per batch with [] for unmentioned handlers). Only what NetWeave touches."""
