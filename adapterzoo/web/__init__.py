"""`adapterzoo serve`: the web page and JSON API, a second face beside cli/ over the same rooms."""
