/**
 * OHIF Viewer 3 configuration: the PACS, and drh-pacs's similar cases as a second data source.
 *
 * Served as OHIF's app-config.js on the same origin as drh-pacs and the PACS (nginx.conf beside this
 * file), so that the drh-pacs login cookie reaches the DICOMweb calls OHIF makes: no token is written
 * in a file every browser downloads. Change nothing but the paths if your proxy maps them elsewhere.
 *
 * - "pacs" (default): Orthanc's DICOMweb for everything, as usual.
 * - "similar": drh-pacs answers the queries (QIDO-RS), the PACS serves metadata and pixels (WADO-RS).
 *   Open OHIF's study list of the studies most similar to a reference with
 *     https://viewer.example.org/?dataSources=similar&similarTo=<StudyInstanceUID>
 *   (drh-pacs's page links there when DRH_VIEWER_URLS has it, see deploy/viewers/README.md). With
 *   similarTo the QIDO root is drh-pacs's per-reference root, whose study list is the ranking; without
 *   it, the plain root, where a study OHIF opens is answered as itself (and a study list without a
 *   StudyInstanceUID or AccessionNumber is refused: drh-pacs is no archive to browse).
 *
 * Keys checked against OHIF's DicomWebConfig type (extensions/default/src/DicomWebDataSource/utils/
 * dicomWebConfig.ts) and its qido.js; onConfiguration(config, { params, query }) is called by the
 * data source's initialize with the URL's query (URLSearchParams).
 */
window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  defaultDataSourceName: 'pacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {
        friendlyName: 'PACS (Orthanc)',
        name: 'pacs',
        qidoRoot: '/pacs/dicom-web',
        wadoRoot: '/pacs/dicom-web',
        wadoUriRoot: '/pacs/wado',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
      },
    },
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'similar',
      configuration: {
        friendlyName: 'Similar cases (drh-pacs)',
        name: 'similar',
        qidoRoot: '/dicom-web',
        wadoRoot: '/pacs/dicom-web',
        wadoUriRoot: '/pacs/wado',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        // drh-pacs matches literally: no "*value*" wrapping, no fuzzy matching
        supportsFuzzyMatching: false,
        supportsWildcard: false,
        onConfiguration: (config, { query }) => {
          const reference = query && query.get('similarTo');
          if (!reference || !/^[0-9.]{1,64}$/.test(reference)) {
            return config;
          }
          return { ...config, qidoRoot: '/dicom-web/similar/study/' + reference };
        },
      },
    },
  ],
};
