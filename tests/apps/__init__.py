"""Small applications that the server tests run in subprocesses."""
