"""The edges: Kafka, ActiveCampaign, the schema registry. Never imports the pipeline."""
