"""``python -m speechmapper_tune.pretrained {list,path,export}``."""

from speechmapper_tune.pretrained import main

main()
