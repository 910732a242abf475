"""The program around the file service, the one owner of lifecycle: the supervisor (binds,
reloads, stops), the gate in front of the service, aiocoap contexts and credentials, what
systemd is told (`service_manager`), logging for the journal (`journal`), and running in the
foreground or detached (`program`)."""
