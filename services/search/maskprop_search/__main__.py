from maskprop_search.service import main

main()
