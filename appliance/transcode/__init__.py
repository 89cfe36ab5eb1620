"""Transfer-syntax policy and transcoding: store format and send format (issue 3)."""
