"""The front-panel status page, its JSON API and /metrics (`appliance web`)."""
