"""CoAP in, CoAP out: the file service resource (`resource`), the options and preconditions it
checks, Block2 responses and Block1 assembly, Observe timing, and the response code for every
problem (`errors`). Nothing here touches the file system; `tree` does."""
