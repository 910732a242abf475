"""CoAP in and out on the wire: the aiocoap server contexts the program binds, with what aiocoap's
message layer lacks for a server on the open Internet added per context — bounded deduplication
state (`dedup`), amplification limits with RFC 9175 Echo (`amplification`), and datagram guards
(`datagrams`: truncated datagrams refused, ICMP errors blamed on the right peer)."""
