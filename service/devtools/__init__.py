"""What runs the service on one machine: the ActiveCampaign emulator, the demo, sample events,
the local broker. Never imported by the service itself."""
