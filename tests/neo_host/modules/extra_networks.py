"""modules/extra_networks.py (Neo): the parts NetWeave meets are Forge 2's."""
from . import same_as

same_as("forge_host", "extra_networks", globals())
