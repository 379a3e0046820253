"""A faithful stand-in for the parts of the ActiveCampaign v3 API this service uses."""
