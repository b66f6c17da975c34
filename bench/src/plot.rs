//! The latency-percentile picture `keybroker-bench load --plot` draws:
//! one curve per server/method, percentiles on a "nines" axis (50, 90, 99,
//! 99.9, 99.99), latency on a log axis, as SVG (no fonts needed).

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Percentiles drawn, as "nines": x = -log10(1 - q).
const QUANTILES: [f64; 13] = [
    0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999,
];

fn nines(q: f64) -> f64 {
    -(1.0 - q).log10()
}

pub(crate) fn latency_percentiles(
    path: &Path,
    title: &str,
    curves: &[(String, Histogram<u64>)],
) -> anyhow::Result<()> {
    let plot_err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    let points: Vec<Vec<(f64, f64)>> = curves
        .iter()
        .map(|(_, h)| {
            QUANTILES
                .iter()
                .map(|q| {
                    (
                        nines(*q),
                        (h.value_at_quantile(*q) as f64 / 1000.0).max(1.0),
                    )
                })
                .collect()
        })
        .collect();
    let y_max = points
        .iter()
        .flatten()
        .map(|(_, y)| *y)
        .fold(10.0, f64::max)
        * 1.5;
    let y_min = points
        .iter()
        .flatten()
        .map(|(_, y)| *y)
        .fold(f64::MAX, f64::min)
        .min(y_max / 10.0)
        / 1.5;
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(nines(0.5)..nines(0.99999), (y_min..y_max).log_scale())
        .map_err(|e| plot_err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency per request (µs, log scale)")
        .x_labels(6)
        .x_label_formatter(&|x| {
            let q = 100.0 * (1.0 - 10f64.powf(-x));
            format!(
                "p{}",
                format!("{q:.3}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
            )
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| plot_err(&e))?;
    let colors = [
        RGBColor(90, 90, 90),
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
    ];
    for (i, ((name, _), series)) in curves.iter().zip(&points).enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                series.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| plot_err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        chart
            .draw_series(series.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| plot_err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(|e| plot_err(&e))?;
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}
