"""ac-audience-sync: keeps ActiveCampaign lists in step with CDP audience events from Kafka."""

__version__ = "0.1.0"
