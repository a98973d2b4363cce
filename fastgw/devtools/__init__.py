"""Development tools shipped with fastgw: the mock upstream."""
