"""The applications: the resumable story and video runners, the command line and the web UI."""
