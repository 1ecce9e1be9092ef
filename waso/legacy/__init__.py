"""The road from the legacy Node.js/Baileys gateway: reading its multi-file auth directories.

``waso.legacy.creds`` judges one ``creds.json``, ``waso.legacy.mapping`` reads the phone→company
mapping, ``waso.legacy.scan`` walks a tree of auth directories and reports per company, and
``waso.legacy.manifests`` turns a scan into WhatsAppSession manifests for a GitOps import.
This package reads files and writes the manifests it is asked for; it never talks to the API
server and depends on ``waso.api`` only.
"""
