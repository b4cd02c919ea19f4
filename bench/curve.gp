# Renders bench/curve.sh's results: meterd events/s as a ratio to a raw librdkafka consumer of
# the same topic in the same run, against orgs (log x), one line per (partitions, shards).
# Solid: steady (events counted, 10 % to 90 % of the point); dashed, same colour: to exact
# totals in Postgres (from assignment, including the wait for the last flush).
# Points whose totals were not exact are left out.
#   gnuplot -e "results='bench/curve-results.tsv'; png='bench/curve.png'; combos='8/1 8/2 64/1 64/2'" bench/curve.gp
if (!exists("results")) results = 'bench/curve-results.tsv'
if (!exists("png")) png = 'bench/curve.png'
if (!exists("combos")) combos = '8/1 8/2 64/1 64/2'

set datafile separator "\t"
set terminal pngcairo size 1000,600 enhanced font ",11"
set output png
set title "meterd throughput vs cardinality (ratio to raw librdkafka consume, same run)"
set xlabel "orgs"
set ylabel "meterd events/s / raw events/s"
set logscale x 10
set autoscale xfix
set offsets graph 0.05, graph 0.05, 0, 0
set format x "10^{%L}"
set yrange [0:*]
set grid
set key outside right top

parts(w) = int(substr(w, 1, strstrt(w, "/") - 1))
shards(w) = int(substr(w, strstrt(w, "/") + 1, strlen(w)))
# One line's rows (columns: 2 partitions, 3 shards, 24 exact), through awk so that the other
# lines' rows do not break it.
rows(w) = sprintf("< awk -F'\\t' 'NR > 1 && $2 == %d && $3 == %d && $24 == \"yes\"' '%s'", \
                  parts(w), shards(w), results)

# Columns: 1 orgs, 8 steady_ratio, 10 exact_ratio.
plot for [i = 1:words(combos)] rows(word(combos, i)) using 1:8 \
       with linespoints lw 2 pt 7 lc i \
       title sprintf("%d partitions, %d shard%s", parts(word(combos, i)), shards(word(combos, i)), \
                     shards(word(combos, i)) > 1 ? "s" : ""), \
     for [i = 1:words(combos)] rows(word(combos, i)) using 1:10 \
       with linespoints lw 1 dt 2 pt 6 lc i \
       title "  (to exact totals)"
