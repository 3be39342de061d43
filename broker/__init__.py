"""msmt-broker: policy-controlled sharing of sanctions-monitoring sightings among MSMT members."""

__version__ = "0.1.0"
