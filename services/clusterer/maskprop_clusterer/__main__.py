from maskprop_clusterer.service import main

main()
