"""Certificate tooling for Domain Security: ``milterd cert request|import|list|check``.

Domain Security only works if both ends hold certificates that chain to a trusted CA, name the
host, and are not expired or revoked; these commands make the routine steps (make a request,
install what the CA returned, see what is installed and when it expires, check one certificate
the way a peer would) safe and scriptable.  Built on the ``cryptography`` package; ``check``
also runs the ``openssl`` command (3.0 or later; Debian's ``postfix`` pulls it in via
``ssl-cert``), because the verdict that matters is the one of the OpenSSL library Postfix and
most partners verify with.

Exit codes: 0 success; 1 the material was checked and refused (``check`` failures, an expired or
key-mismatched PKCS#12 on ``import``); 2 usage or input errors (bad subject, unreadable file,
wrong password).  Errors are one line on stderr, never a traceback, and never contain a
password or key material.

Modules:

* ``common`` — the error type, reading certificates and files, fingerprints, safe key writing;
* ``request``, ``importing``, ``listing``, ``check`` — one command each (``check`` with
  ``openssl``, which runs ``openssl verify``, and ``explain``, which words its errors);
* ``expiry`` — the rows behind the daemon's certificate-expiry gauge;
* ``cli`` — ``register``, the argparse wiring;
"""
